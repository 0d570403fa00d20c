"""Collecting preferences: the Pick-a-Pic web app (``pickscore collect``), its database, and the export that
``pickscore train`` reads. app.py serves the pages, store.py owns the database, sources.py makes candidates,
report.py summarises the choices, export.py writes the dataset."""
