"""The turn worker (`parley worker`): one process per GPU holding the model, running
`parley.run_turn`, its heartbeat and the reconciler."""
