"""optax_dist: distributed optimizers as composable optax transformations."""

from optax_dist._agn import AGNState
from optax_dist._agn import agn
from optax_dist._agreement import check_agreement
from optax_dist._comm import Collective
from optax_dist._comm import CommunicationReport
from optax_dist._comm import communication_report
from optax_dist._declare import Pending
from optax_dist._diloco import DiLoCoState
from optax_dist._diloco import diloco
from optax_dist._distributed import initialize_from_env
from optax_dist._elastic import ElasticAverageState
from optax_dist._elastic import elastic_average
from optax_dist._flags import checking_sync_flags
from optax_dist._layout import per_worker
from optax_dist._minimize import minimize
from optax_dist._model_average import ModelAverageState
from optax_dist._model_average import model_average
from optax_dist._nonfinite import ApplyIfAllFiniteState
from optax_dist._nonfinite import apply_if_all_finite
from optax_dist._overlap import Dependence
from optax_dist._overlap import OverlapReport
from optax_dist._overlap import overlap_report
from optax_dist._params import average_params
from optax_dist._params import broadcast_params
from optax_dist._resize import resize_workers
from optax_dist._schedule import SyncSchedule
from optax_dist._schedule import SyncState
from optax_dist._slots import get_slot
from optax_dist._slots import get_slot_names
from optax_dist._slots import global_step
from optax_dist._state import call_count
from optax_dist._state import center_params
from optax_dist._state import dropped_syncs
from optax_dist._state import restart_nonfinite
from optax_dist._state import skipped_syncs
from optax_dist._state import sync_flags
from optax_dist._state import sync_schedule
from optax_dist._step import data_parallel_eval_step
from optax_dist._step import data_parallel_step
from optax_dist._tower import TowerState
from optax_dist._tower import tower

__version__ = "0.1.0"

__all__ = (
  "AGNState",
  "ApplyIfAllFiniteState",
  "Collective",
  "CommunicationReport",
  "Dependence",
  "DiLoCoState",
  "ElasticAverageState",
  "ModelAverageState",
  "OverlapReport",
  "Pending",
  "SyncSchedule",
  "SyncState",
  "TowerState",
  "agn",
  "apply_if_all_finite",
  "average_params",
  "broadcast_params",
  "call_count",
  "center_params",
  "check_agreement",
  "checking_sync_flags",
  "communication_report",
  "data_parallel_eval_step",
  "data_parallel_step",
  "diloco",
  "dropped_syncs",
  "elastic_average",
  "get_slot",
  "get_slot_names",
  "global_step",
  "initialize_from_env",
  "minimize",
  "model_average",
  "overlap_report",
  "per_worker",
  "resize_workers",
  "restart_nonfinite",
  "skipped_syncs",
  "sync_flags",
  "sync_schedule",
  "tower",
)
