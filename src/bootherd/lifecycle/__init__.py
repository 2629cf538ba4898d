"""The node lifecycle: one coordinator (core.py, sans-IO) and its runner (runner.py).

Read core.py first: it is where a newcomer learns why a node did what it did.
"""

from .core import (
    Answer,
    Candidate,
    ClearNextOS,
    Coordinator,
    Effect,
    EventWindow,
    NodeLife,
    Record,
    RecordState,
    RecoveryPolicy,
    Remember,
    ResendThenFail,
    SendOrder,
    StartReload,
    Stuck,
    Via,
    reply_state,
)
from .ladder import Ladder, LadderSettings, PowerCycle, SendIpod
from .runner import Lifecycle, OrderSender

__all__ = ["Answer", "Candidate", "ClearNextOS", "Coordinator", "Effect", "EventWindow",
           "Ladder", "LadderSettings", "Lifecycle", "NodeLife", "OrderSender", "PowerCycle",
           "Record", "RecordState", "RecoveryPolicy", "Remember", "ResendThenFail", "SendIpod",
           "SendOrder", "StartReload", "Stuck", "Via", "reply_state"]
