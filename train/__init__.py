"""Everything a training run needs: config, data, schedules, the DeepSpeed engine, the loop."""
