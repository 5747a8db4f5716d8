"""Lightning callbacks of surgenet-ssl (edges only: the algorithm does not know about them)."""

from surgenet_ssl.callbacks.batch_trace import BatchTrace
from surgenet_ssl.callbacks.checkpoint import ArchiveCheckpoint, RollingCheckpoint
from surgenet_ssl.callbacks.export import TeacherExport
from surgenet_ssl.callbacks.knn_monitor import KNNMonitor
from surgenet_ssl.callbacks.preemption import PreemptionCheckpoint, TrainingPreempted
from surgenet_ssl.callbacks.progress import LoggingStepProgressBar, logs_written_now
from surgenet_ssl.callbacks.throughput import ThroughputMonitor

__all__ = [
    "ArchiveCheckpoint",
    "BatchTrace",
    "KNNMonitor",
    "LoggingStepProgressBar",
    "PreemptionCheckpoint",
    "RollingCheckpoint",
    "TeacherExport",
    "ThroughputMonitor",
    "TrainingPreempted",
    "logs_written_now",
]
