"""Batch scoring jobs: a document store against a list of classifiers, resumable exactly once.

Takes its ``classify`` from the caller (an engine, the service's scheduler, a Ray actor's
engine) and never imports ``headfleet.service``.
"""

from headfleet.scoring.chunk import ScoredChunk, score_rows
from headfleet.scoring.job import Cancelled, JobSpec, ScoreJob
from headfleet.scoring.output import read_output
from headfleet.scoring.report import format_report
from headfleet.scoring.sources import Source, SourceSpec

__all__ = ["Cancelled", "JobSpec", "ScoreJob", "ScoredChunk", "Source", "SourceSpec", "format_report",
           "read_output", "score_rows"]
