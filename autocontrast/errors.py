"""Every error a user can cause, in one place.

Each class says what kind of mistake it is; the message says what was wrong and what to do.
All derive from `AutocontrastError`, so a CLI (see `autocontrast.cli_support`) can print the
message without a traceback, and a service can catch one base class.
"""


class AutocontrastError(Exception):
    """Base class of every error autocontrast raises on bad input or a bad environment."""


class ConfigurationError(AutocontrastError, ValueError):
    """A multi-exit configuration that contradicts itself or the model it is used with."""


class UnknownExitError(ConfigurationError):
    """An exit (layer index or 'original') that the checkpoint or bundle does not have."""


class UnsupportedArchitectureError(AutocontrastError, ValueError):
    """A model architecture with no registered multi-exit family."""


class MissingExitWeightsError(AutocontrastError, ValueError):
    """A checkpoint lacks the exit heads or cast matrices that its projection mode needs."""


class BundleError(AutocontrastError, ValueError):
    """An export bundle that is missing, corrupt, of another format version, or inconsistent."""


class ExportError(AutocontrastError, RuntimeError):
    """An export that cannot be done as asked (output exists, unsupported option, ...)."""


class ExportValidationError(ExportError):
    """An exported graph whose outputs differ from PyTorch beyond the stated tolerance."""


class ProviderUnavailableError(AutocontrastError, RuntimeError):
    """An execution provider (CUDA, TensorRT) that is not installed or has no device to run on."""


class GenerationParameterError(AutocontrastError, ValueError):
    """A generation parameter out of its allowed range (max_new_tokens, top_p, temperature, ...)."""


class PromptError(AutocontrastError, ValueError):
    """A prompt that is empty or longer than the model can take."""


class DataError(AutocontrastError, ValueError):
    """Training or evaluation data that is missing, empty or unusable."""


class RuntimeOptionError(AutocontrastError, ValueError):
    """A runtime option out of its sane range (threads, ...)."""


class ContrastFunctionError(ConfigurationError):
    """A custom contrast function or logits processor whose result is not usable scores."""


class InferenceError(AutocontrastError, RuntimeError):
    """ONNX Runtime failed while running a graph of a bundle."""


class RowError(AutocontrastError, KeyError):
    """A stepping-API call naming a row that is not (or no longer) in the batch."""


class RequestStateError(AutocontrastError, RuntimeError):
    """A request moved where its status does not allow: submitted twice, or driven on after it ended."""


class ClusterError(AutocontrastError, RuntimeError):
    """A Ray cluster that cannot be reached, or replicas that cannot be placed or started on it."""
