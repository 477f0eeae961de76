"""Ground floor: what every other package may use and which uses nothing of the project.

`errors` (UserError: one line, exit 2; RunStopped: exit 3), `settings` (`setting(default, lo=,
hi=, choices=)` declares a config field's range once; `check_fields` applies the same rules to a
section built in code) and `keys` (`draw_key(seed, purpose, *ids)`: every random draw's key). Imports
nothing from mlx_coach.
"""
