-- checkpoints: one row per checkpoint, read straight from the zoo's committed Parquet parts.
-- {{files}} is the list of part files named by manifest.json (uncommitted parts are never listed).
-- Columns: see docs/design.md, "The zoo on disk".
SELECT * FROM read_parquet({{files}}, union_by_name = true)
