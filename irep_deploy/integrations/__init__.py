"""Optional integrations with the tools users train their networks in (timm, Ultralytics).

Each module here imports its third-party package when it is itself imported; nothing in the core
(``irep_deploy`` outside this folder) imports them, so the extras stay optional. Ultralytics is
AGPL-3.0: it is installed only by the user (``pip install irep-deploy[ultralytics]``).
"""
