"""The error types deepsqueeze raises. Every user-facing failure is one of these."""


class DeepSqueezeError(Exception):
    """Base class of every error deepsqueeze raises on purpose."""


class DataError(DeepSqueezeError):
    """A dataset could not be found, read or verified."""


class DatasetNotFoundError(DataError):
    """No copy of a dataset was found in any searched place and it could not be downloaded."""


class DatasetCorruptError(DataError):
    """A dataset file exists but is truncated, corrupt or fails its checksum."""


class ModelError(DeepSqueezeError):
    """An unknown model name, bad model options, or a model file that cannot be used."""


class CheckpointError(DeepSqueezeError):
    """A checkpoint or model file is missing, unsafe (pickle payload) or inconsistent."""


class DsqFormatError(DeepSqueezeError):
    """A .dsq file is malformed: bad magic, version, manifest, lengths or checksums."""


class RecipeError(DeepSqueezeError):
    """A compression recipe is invalid; the message names the wrong field."""


class OptionError(DeepSqueezeError):
    """An option or argument is out of its range or not one of its allowed values (named)."""


class OutputPathError(DeepSqueezeError):
    """An output path cannot be written, or is one of the command's input files."""


class RuntimeInputError(DeepSqueezeError, ValueError):
    """An input a runtime layer cannot take (shape, dtype, device, layout), or a call the C
    kernel refused; the message names the layer and what it expects."""
