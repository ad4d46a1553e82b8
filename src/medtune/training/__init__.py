"""The one training loop, the fine-tuning strategies (schedules of phases), frozen-prefix features and
numeric precision."""
