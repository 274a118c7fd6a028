"""The evaluation API: the field's metrics, and the evaluator that embeds and ranks a test split.

    from tbps.evaluation import rank_metrics
    rank_metrics(similarity, query_pids, gallery_pids)   # {"R1", "R5", "R10", "mAP", "mINP"} in percent
"""

from tbps.engine.evaluator import Evaluator, evaluate_checkpoint, format_metrics_table
from tbps.engine.metrics import rank_metrics, rank_metrics_from_scores

__all__ = ["rank_metrics", "rank_metrics_from_scores", "Evaluator", "evaluate_checkpoint", "format_metrics_table"]
