"""pipelines: end-to-end flows (collect, train, unlearn, evaluate, report) and the CLI."""
