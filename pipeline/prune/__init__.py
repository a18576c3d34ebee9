"""Channel and block pruning under a latency budget measured on the target. Stages import these
names only; one module per idea:

- ``budget``: the ``Budget`` (target ms, band, measurement noise) and its one verdict rule.
- ``groups``: prunable groups (``PruneGroup``), the widths each may take, hard masks.
- ``soft``: the soft-mask search (SCP with a latency table): ``SoftMaskedNet``, ``BudgetPenalty``.
- ``importance``: pruning criteria behind one interface (``Importance``): Taylor, the soft masks' own
  probabilities, L1 magnitude.
- ``knapsack``: ``allocate_widths``, the latency-aware width allocation on the table.
- ``loop``: ``closed_loop``, measuring on the target until the network is in the budget's band.
- ``space``, ``measure``, ``training``, ``decide``, ``records``, ``state``: the prune stage's
  steps, free of its files and params: what is pruned, the reference measurement and the budget,
  the search and settling epochs, the decision, what is reported, and the resume records.

The method: rank every channel and removable block (``prune.method``: ``taylor``, the default,
first-order Taylor importance of the trained student, HALP's criterion, every epoch then trains
the decided network; or ``scp``, SCP soft masks trained jointly with oracle distillation and a
budget penalty first), allocate widths on the latency table (``allocate_widths``, or SCP's
threshold ``harden``), adjust them in the closed loop until the slimmed network measured on the
target is in the budget's band, then train the decided network with its masks fixed.
"""

from pipeline.prune.budget import Budget, BudgetError, band_ms
from pipeline.prune.decide import decide_widths, importance_for, val_cost
from pipeline.prune.groups import (
                                   PruneGroup,
                                   allowed_for,
                                   allowed_widths,
                                   blocks_only,
                                   harden,
                                   inner_groups,
                                   is_live,
                                   kept_indices,
                                   masks_for_widths,
                                   nearest_allowed,
                                   prune_groups,
                                   smallest_masks,
                                   top_mask,
                                   widths_of,
)
from pipeline.prune.importance import (
                                   Importance,
                                   L1Importance,
                                   Ranking,
                                   SoftMaskImportance,
                                   TaylorImportance,
                                   filter_l1,
                                   normalize_importance,
                                   sampled_label_loss,
                                   taylor_batches,
                                   taylor_importance,
)
from pipeline.prune.knapsack import allocate_widths
from pipeline.prune.loop import LoopResult, closed_loop
from pipeline.prune.measure import (
                                   BudgetReading,
                                   Reference,
                                   measure_alone,
                                   measure_paired,
                                   measure_reference_budget,
                                   share_reference,
)
from pipeline.prune.records import (
                                   Pruned,
                                   Training,
                                   history_rows,
                                   loop_rows,
                                   masks_record,
                                   prune_metrics,
                                   score,
                                   summary,
                                   width_rows,
)
from pipeline.prune.soft import BudgetPenalty, SoftMaskedNet, deactivation_prob, gumbel_keep_mask
from pipeline.prune.space import PruneSpace, prune_space
from pipeline.prune.state import ResumeState
from pipeline.prune.training import SETTLE_PHASES, joint_training, rebuild, schedule, settle

__all__ = [
    "SETTLE_PHASES", "Budget", "BudgetError", "BudgetPenalty", "BudgetReading", "Importance", "L1Importance", "LoopResult",
    "PruneGroup", "PruneSpace", "Pruned", "Ranking", "Reference", "ResumeState", "SoftMaskImportance",
    "SoftMaskedNet", "TaylorImportance", "Training", "allocate_widths", "allowed_for", "allowed_widths", "band_ms",
    "blocks_only", "closed_loop", "deactivation_prob", "decide_widths", "filter_l1", "gumbel_keep_mask", "harden",
    "history_rows", "importance_for", "inner_groups", "is_live", "joint_training", "kept_indices", "loop_rows",
    "masks_for_widths", "masks_record", "measure_alone", "measure_paired", "measure_reference_budget",
    "nearest_allowed", "normalize_importance", "prune_groups", "prune_metrics", "prune_space", "rebuild", "sampled_label_loss",
    "schedule", "score", "settle", "share_reference", "smallest_masks", "summary", "taylor_batches", "taylor_importance",
    "top_mask", "val_cost", "width_rows", "widths_of",
]
