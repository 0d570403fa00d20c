"""Alembic's entry point for the collection database: runs on the connection ``database.migrate`` hands over.

A new revision (after changing the models in store.py), from the repository root:

    alembic -c pickscore/collect/migrations/alembic.ini revision --autogenerate -m "what changed"

then read the generated file, and check that
``tests/collect/test_app.py::test_migrations_build_exactly_the_models_schema`` passes.
"""

from alembic import context

from pickscore.collect.store import Base

connection = context.config.attributes.get("connection")
if connection is None:  # the alembic command line: a URL from alembic.ini or -x url=...
    from sqlalchemy import create_engine

    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    with create_engine(url).connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
