"""The A/B slot identity: partition numbers, type and partition GUIDs, attribute bits, slot names.

Every module that needs to know which partition is slot A, what a USR partition's type GUID is, or
where priority/tries/successful sit in the GPT attribute field imports them from here
(reference/image-build.md §2.1). Pure data and pure functions; imports nothing of obelisk.
"""

from __future__ import annotations

import uuid

USR_TYPE = uuid.UUID("5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6")
ROOT_TYPE = uuid.UUID("3884dd41-8582-4404-b9a8-e9b84f2df50e")
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
# ChromeOS kernel type: what upstream cgpt's prioritize acts on (used by interop tests).
CHROMEOS_KERNEL_TYPE = uuid.UUID("fe3a2a5d-4f32-41a7-b725-accc3285a309")

USR_A, USR_B = 3, 4
USR_A_UUID = uuid.UUID("7130c94a-213a-4e5a-8e26-6cce9662f132")
USR_B_UUID = uuid.UUID("e03dd35c-7c2d-4a47-b3fe-27f15780a57c")

SLOT_NAMES = ("A", "B")
SLOT_INDEX = {"A": USR_A, "B": USR_B}
INDEX_NAME = {USR_A: "A", USR_B: "B"}
SLOT_UUID = {"A": USR_A_UUID, "B": USR_B_UUID}

PRIORITY_SHIFT, TRIES_SHIFT, SUCCESSFUL_SHIFT = 48, 52, 56
PRIORITY_MASK = 0xF << PRIORITY_SHIFT
TRIES_MASK = 0xF << TRIES_SHIFT
SUCCESSFUL_MASK = 1 << SUCCESSFUL_SHIFT
MAX_PRIORITY = MAX_TRIES = 15


def name_of(index: int) -> str:
    """"A" for 3, "B" for 4, the number itself for any other partition."""
    return INDEX_NAME.get(index, str(index))


def other(index: int) -> int:
    """The other slot's partition number."""
    return USR_B if index == USR_A else USR_A


def parse_slot(value: str) -> int | None:
    """Partition number of a slot written as "A", "B", "3", "4", "USR-A" or "USR-B" (any case); None otherwise."""
    v = value.strip().upper()
    for name, index in SLOT_INDEX.items():
        if v in (name, str(index), f"USR-{name}"):
            return index
    return None


def decode_bits(attributes: int) -> tuple[int, int, int]:
    """(priority, tries, successful as 0/1) of a 64-bit attribute value."""
    return ((attributes >> PRIORITY_SHIFT) & 0xF, (attributes >> TRIES_SHIFT) & 0xF,
            (attributes >> SUCCESSFUL_SHIFT) & 1)


def encode_bits(attributes: int, priority: int, tries: int, successful: int) -> int:
    """``attributes`` with the three slot fields replaced; every other bit is kept."""
    attributes &= ~(PRIORITY_MASK | TRIES_MASK | SUCCESSFUL_MASK)
    return (attributes | (priority << PRIORITY_SHIFT) | (tries << TRIES_SHIFT)
            | (int(bool(successful)) << SUCCESSFUL_SHIFT)) & 0xFFFFFFFFFFFFFFFF
