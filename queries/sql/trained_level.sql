-- trained_level: how well a plainly trained network of the zoo's task does. The median, over the
-- runs that train on every class (nothing undersampled, nothing deleted), of their last
-- checkpoint's largest class test loss. The pairs view's start_loss_factor scales it into the
-- largest loss a pair's start may have, so that the threshold follows the task: ten classes at
-- 784-7-10 rarely all sit under a loss that MNIST-4's four classes reach.
-- The count says how many runs the median is over (0: the zoo has no such run).
WITH last AS (SELECT run_id, max(step) AS step FROM checkpoints WHERE perm_index = 0 GROUP BY run_id)
SELECT count(*) AS runs, median(greatest({{losses}})) AS level
FROM checkpoints JOIN last USING (run_id, step)
WHERE perm_index = 0 AND len(deleted) = 0 AND len(undersampled) = 0
