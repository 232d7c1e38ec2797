"""OpenAI-compatible graders (string_check, text_similarity, python, score_model, label_model, multi)
and plain reward functions, as callables: `build_grader(spec)(sample, item) -> GradeResult`."""

from tunery.graders.files import load_grader, read_items, read_samples
from tunery.graders.run import Grader, GradeResult, build_grader, from_function, run_response
from tunery.graders.sandbox import SandboxLimits
from tunery.graders.spec import GraderSpec, parse_grader

__all__ = [
    "GradeResult",
    "Grader",
    "GraderSpec",
    "SandboxLimits",
    "build_grader",
    "from_function",
    "load_grader",
    "parse_grader",
    "read_items",
    "read_samples",
    "run_response",
]
