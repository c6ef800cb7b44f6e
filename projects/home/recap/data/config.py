"""Where the ranker's data is and how it is read (the original recap data schema).

tml reads parquet in the segdense layout (see `projects.home.recap.data.schema`); the
original's tf.data-service, date-range and sampling options are in the schema so its
configs load, and refused when set.
"""

from __future__ import annotations

import enum

import pydantic

from tml.core.config.base_config import BaseConfig, Field
from tml.core.config.compat import compat_field

from ..config_support import refuse_when_set


class ExplicitDateInputs(BaseConfig):
    data_root: str
    end_date: str
    days: int
    num_missing_days_tol: int = 0


class ExplicitDatetimeInputs(BaseConfig):
    data_root: str
    end_datetime: str
    hours: int
    num_missing_hours_tol: int = 0


class DdsCompressionOption(str, enum.Enum):
    AUTO = "AUTO"


class TruncateAndSlice(BaseConfig):
    continuous_feature_truncation: pydantic.PositiveInt | None = Field(
        None, description="Keep the first N continuous values.")
    binary_feature_truncation: pydantic.PositiveInt | None = Field(
        None, description="Keep the first N binary values.")
    continuous_feature_mask_path: str | None = Field(None, description="Not supported.")
    binary_feature_mask_path: str | None = Field(None, description="Not supported.")

    refuse_masks = refuse_when_set("continuous_feature_mask_path", "binary_feature_mask_path")


class Preprocess(BaseConfig):
    truncate_and_slice: TruncateAndSlice | None = None
    downcast: dict | None = Field(None, description="Not supported.")
    rectify_labels: dict | None = Field(None, description="Not supported.")
    extract_features: dict | None = Field(None, description="Not supported.")
    downsample_negatives: dict | None = Field(None, description="Not supported.")

    refuse_others = refuse_when_set("downcast", "rectify_labels", "extract_features",
                                    "downsample_negatives")


class TaskData(BaseConfig):
    pos_downsampling_rate: float = Field(1.0, gt=0.0, le=1.0, description="Share of positives "
                                         "kept when the data was made (weights 1/rate).")
    neg_downsampling_rate: float = Field(1.0, gt=0.0, le=1.0, description="Share of negatives "
                                         "kept when the data was made (weights 1/rate).")


class SegDenseSchema(BaseConfig):
    schema_path: str = Field(..., description="segdense.json: the features and their lengths.")
    features: list[str] = Field([], description="Not supported (extra features).")
    renamed_features: dict[str, str] = Field({}, description="Model name -> feature name: "
                                             "continuous, binary, discrete, user_embedding, "
                                             "user_eng_embedding, author_embedding, meta__*.")
    mask_mantissa_features: dict[str, int] = Field({}, description="Not supported.")

    @pydantic.field_validator("features", "mask_mantissa_features")
    @classmethod
    def _empty(cls, value: object, info: pydantic.ValidationInfo) -> object:
        if value:
            raise ValueError(f"{info.field_name} is not supported by tml's recap (leave it "
                             "empty)")
        return value


class RecapDataConfig(BaseConfig):
    inputs: str | None = Field(None, one_of="date_inputs_format", description="Parquet files: "
                               "a glob, a directory or one file (any fsspec URL).")
    explicit_datetime_inputs: ExplicitDatetimeInputs | None = Field(
        None, one_of="date_inputs_format", description="Not supported.")
    explicit_date_inputs: ExplicitDateInputs | None = Field(
        None, one_of="date_inputs_format", description="Not supported.")
    global_batch_size: pydantic.PositiveInt = Field(..., description="Examples per step, all "
                                                    "workers together.")
    num_files_to_keep: pydantic.PositiveInt | None = Field(None, description="Use only the "
                                                           "first N files.")
    repeat_files: bool = Field(True, description="Training repeats the data until "
                               "num_train_steps (always, as in the original).")
    file_batch_size: pydantic.PositiveInt = compat_field(16, "tf.data option; files are "
                                                         "read one at a time")
    cache: bool = compat_field(False, "tf.data option")
    data_service_dispatcher: str | None = Field(None, description="Not supported.")
    ignore_data_errors: bool = Field(False, description="Must stay false: bad rows are errors.")
    dataset_service_compression: DdsCompressionOption | None = compat_field(
        None, "tf.data service option; there is no data service")
    examples_shuffle_buffer_size: int = compat_field(
        1024, "data is read in file order, so a resumed run reads the same")
    map_num_parallel_calls: pydantic.PositiveInt | None = compat_field(None, "tf.data option")
    interleave_num_parallel_calls: pydantic.PositiveInt | None = compat_field(
        None, "tf.data option")
    seg_dense_schema: SegDenseSchema
    tasks: dict[str, TaskData] = Field(..., description="The label columns.")
    evaluation_tasks: list[str] = Field([], description="Tasks reported in evaluation "
                                        "(default all of the model's).")
    preprocess: Preprocess | None = None
    sampler: dict | None = Field(None, description="Not supported (deprecated).")

    refuse_unsupported = refuse_when_set("explicit_datetime_inputs", "explicit_date_inputs",
                                         "data_service_dispatcher", "sampler")

    @pydantic.field_validator("ignore_data_errors")
    @classmethod
    def _no_ignoring(cls, value: bool) -> bool:
        if value:
            raise ValueError("ignoring data errors is not supported (a bad row is an error "
                             "naming its file and row)")
        return value

    @pydantic.model_validator(mode="after")
    def _evaluation_tasks_known(self) -> RecapDataConfig:
        for task in self.evaluation_tasks:
            if task not in self.tasks:
                raise ValueError(f"evaluation task '{task}' is not in tasks")
        return self
