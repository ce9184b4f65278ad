"""cc-metric-archiver: ClusterCockpit metric checkpoints to one sorted Parquet file per cluster.

The Celery app and everything else that imports celery, kombu or redis live in
`workers.distributed` (`celery -A workers` finds the app through `workers.celery`);
importing this package stays light so the CLI and the embedded runner start fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cc-metric-archiver")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
