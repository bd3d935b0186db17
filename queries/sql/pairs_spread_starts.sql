-- pairs_spread_starts: the pairs view's per-start stage ({{spread_starts}} in pairs.sql when
-- $start_cap > 0). Each θ keeps its $start_cap candidates of smallest hash; a second, independent
-- hash then orders them for the run's $cap. Ordering by the first would favour the starts with the
-- most candidates, whose smallest hashes are the smallest.
spread AS (
    SELECT run_id, checkpoint_id, target_id,
           hash(CAST(checkpoint_id AS BIGINT), CAST(target_id AS BIGINT), CAST($seed AS BIGINT) + 1) AS h
    FROM (SELECT run_id, checkpoint_id, unnest(min_by(target_id, h, $start_cap)) AS target_id
          FROM candidates GROUP BY run_id, checkpoint_id)
),
