-- retrieval: the zoo's own answer to a forget request (the control for the hypernetworks).
-- Original checkpoints (perm_index 0) with finite accuracies, ranked as unlearning ranks its
-- candidates (pipelines.unlearn.select_best): lowest mean forget-class accuracy first, then the
-- highest mean retain-class accuracy, then the lowest id. The accuracies are the metadata's (the
-- zoo's test split); the caller re-selects among the top $k on its validation split, exactly as
-- it does for sampled candidates.
-- {{forget_acc}} / {{retain_acc}}: the means over the forget / retain accuracy columns.
SELECT checkpoint_id, run_id, step, {{forget_acc}} AS forget_acc, {{retain_acc}} AS retain_acc
FROM checkpoints
WHERE perm_index = 0 AND isfinite({{forget_acc}}) AND isfinite({{retain_acc}})
ORDER BY forget_acc ASC, retain_acc DESC, checkpoint_id ASC
LIMIT $k
