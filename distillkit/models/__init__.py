"""Loading teachers and students, and building students from a spec derived from the teacher."""

from distillkit.models.arch import SUPPORTED_FAMILIES, check_vocab, family
from distillkit.models.capture import capture_qkv, pool
from distillkit.models.load import TASKS, LoadedModel, detect_task, load_config, load_model
from distillkit.models.spec import SPEC_KEYS, is_spec, parse_student_spec, resolve_spec
from distillkit.models.student import StudentPlan, build_student, plan_student, select_layers, student_config

__all__ = [
    "SPEC_KEYS",
    "SUPPORTED_FAMILIES",
    "TASKS",
    "LoadedModel",
    "StudentPlan",
    "build_student",
    "capture_qkv",
    "check_vocab",
    "detect_task",
    "family",
    "is_spec",
    "load_config",
    "load_model",
    "parse_student_spec",
    "plan_student",
    "pool",
    "resolve_spec",
    "select_layers",
    "student_config",
]
