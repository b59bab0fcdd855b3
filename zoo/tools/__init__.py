"""User tools on checkpoints: pictures of what a model looks at (`pictures`, `make attention`) and the stored
vocabulary as a SCAN-format file (`vocab`)."""
