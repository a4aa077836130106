#!/usr/bin/env bash
# Development helper: rebuild migration 0001 from the tables while the schema has
# never been deployed. After the first release, add new revisions instead.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f synthray/migrations/versions/0001_initial_schema.py /tmp/synthray-mig.db
.venv/bin/python -c "
from alembic import command
from synthray.migrations import alembic_config
command.revision(alembic_config('sqlite:////tmp/synthray-mig.db'), message='initial schema',
                 autogenerate=True, rev_id='0001')
"
f=synthray/migrations/versions/0001_initial_schema.py
sed -i 's/synthray\.app\.db\.UTCDateTime(timezone=True)/sa.DateTime(timezone=True)/g; /^Create Date/d' "$f"
.venv/bin/ruff format -q "$f"
.venv/bin/ruff check -q --fix "$f" || true
