"""The platform around :mod:`stmi`: Ray Train and Tune, MLflow tracking on S3, the registry, serving, reports.

MLflow's usage telemetry is off in every process that imports this package (unless the environment already says
otherwise): its background thread, on failing to fetch its configuration (always, on a machine without internet
access), removes ``_MLFLOW_TELEMETRY_SESSION_ID`` from ``os.environ`` while another thread's HTTP request to the
tracking server copies ``os.environ`` (``requests`` reads proxy settings from it), and that request fails with
``MlflowException: API request to .../runs/get failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'``. A sweep
trial died of it. The local stack (``infra/local``) and the platform image (``infra/cluster/Dockerfile``) set the
same variable for the servers and for processes that import MLflow before this package.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
