"""Readers for the datasets in their own native layouts (see DESIGN.md, "Native formats").

They validate what they read and never drop a row silently: a bad row or recipe is left out and
recorded in `problems` as (where, reason), so a preparation job can report or fail on it. Every
reason starts with a code word and a colon ("not_utf8: ...", "label_out_of_range: ..."): the data
plane counts skipped samples by that word.

Codes: not_utf8 (any text file), then
  FoodX-251  bad_row, duplicate_id, label_out_of_range, missing_file (an image; a split with none of
             its images found, or no class list or label file, is a DataError naming the closest miss)
  Tasty      missing_file, ambiguous_video, bad_xml, bad_ingredient, empty_recipe, bad_alignment,
             store_error, split_conflict, missing_folder; excluded by rule: unlisted (in no list of
             the split set); decisions: empty_ingredient_skipped, second_amount_kept,
             alignment_extra_lines_ignored, decoded_from_recipe_encoded, unlisted_trained_on
  YouCook2   not_object, bad_field, no_annotations, bad_segment, empty_sentence, duplicate_id; the
             evaluation adds missing_file (no video file) and the media reasons (too_few_frames ...)
  QA         not_json, not_object, short_row, empty_question, empty_answer

Each dataset has its module in ddft.data.readers; this module is where callers import them from.
"""

from ddft.data.readers.common import DataError, Records
from ddft.data.readers.foodx import FoodxDataset, read_foodx
from ddft.data.readers.qa import QA_SPLITS, QAPair, read_qa
from ddft.data.readers.tasty import TASTY_FRAME_STRIDE, TastyRecipe, read_tasty
from ddft.data.readers.youcook2 import YOUCOOK2_SUBSETS, YoucookVideo, find_youcook2, read_youcook2

__all__ = [
    "DataError",
    "Records",
    "FoodxDataset",
    "read_foodx",
    "TastyRecipe",
    "read_tasty",
    "read_qa",
    "QAPair",
    "QA_SPLITS",
    "YoucookVideo",
    "read_youcook2",
    "find_youcook2",
    "TASTY_FRAME_STRIDE",
    "YOUCOOK2_SUBSETS",
]
