"""Dataset readers: each input format or purpose in its own module; they read, and neither score nor train.

A batch job's inputs (rows: one candidate each): ``inputs`` (files -> numbered rows) over ``parquet``,
``webdataset`` and ``manifest``; Pick-a-Pic (``pickapic``: the schema, splits and preference pairs); what
``evaluate-models`` compares (``prompts``, ``image_sets``).
"""
