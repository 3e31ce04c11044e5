"""Serving an export with Ray Serve: the model in memory (model.py), the HTTP API (api.py), the deployment
(app.py), and starting/stopping it (deploy.py)."""
