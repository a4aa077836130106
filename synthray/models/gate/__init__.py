"""The memorization gate: exact search, robust pixel matching, copy detection, the check."""
