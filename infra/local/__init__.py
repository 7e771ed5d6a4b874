"""The local stack: SeaweedFS S3 + bucket, an MLflow tracking server and a Ray head, all on 127.0.0.1.

``python -m infra.local up|down|status`` is the command line; :mod:`infra.local.stack` is the importable API the
tests use to start the same services on free ports.
"""
