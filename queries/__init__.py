"""queries: DuckDB SQL over a zoo's metadata, materialized views, and the streaming loader."""
