"""Jobs over many images: ``pickscore batch`` (rank datasets, resumable; in-process, on servers or on Ray: batch,
ray_batch, and jobdir, the output directory they share; several_models, several served models in one request) and
``pickscore evaluate-models`` (the paper's comparison of text-to-image models: evaluate_models, model_stats,
model_report); commands holds both subcommands."""
