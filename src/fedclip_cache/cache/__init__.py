"""Stage 1: run a frozen open_clip once over every image and write the feature cache (imports no flwr, typer or rich)."""
