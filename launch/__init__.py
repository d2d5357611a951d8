"""The user's front door: the `scalegpt` command, launchers and cluster templates."""
