"""Model cards (`card`), Hub upload (`push`) and model-directory loading (`loading`) for low-rank models."""

from .card import CARD_MARKER, CARD_NAME, is_replaceable_card, make_model_card, read_eval_results, save_model_card
from .loading import NotAModelError, copy_processor_files, load_pretrained_dir, model_task
from .push import OFFLINE_MESSAGE, push_to_hub

__all__ = ["CARD_MARKER", "CARD_NAME", "OFFLINE_MESSAGE", "NotAModelError", "copy_processor_files",
           "is_replaceable_card", "load_pretrained_dir", "make_model_card", "model_task", "push_to_hub",
           "read_eval_results", "save_model_card"]
