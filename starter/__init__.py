"""The user's command line (`keel`, also `python -m starter`). Talks to Temporal through the client only."""
