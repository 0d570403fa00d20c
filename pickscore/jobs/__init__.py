"""Jobs over many images: ``pickscore batch`` (rank datasets, resumable; in-process, on servers or on Ray) and
``pickscore evaluate-models`` (the paper's comparison of text-to-image models)."""
