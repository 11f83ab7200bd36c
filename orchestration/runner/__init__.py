"""The orchestrated-saga runner, one module per responsibility (see :mod:`.driver`)."""
from essential.orchestration.runner.child import child_key
from essential.orchestration.runner.driver import SagaRunner
from essential.orchestration.runner.run import DEFAULT_LINGER

__all__ = ["DEFAULT_LINGER", "SagaRunner", "child_key"]
