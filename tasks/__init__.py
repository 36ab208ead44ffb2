"""The task-specific parts that plug into core's loop: data preparation, loss, evaluation."""
