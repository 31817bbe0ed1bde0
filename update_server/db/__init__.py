"""Fleet state in a database: SQLite by default, PostgreSQL for replicas (models, migrations, store)."""
