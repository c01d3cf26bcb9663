"""What the stages share: configuration, CLI, data, views, models, losses, metrics."""
