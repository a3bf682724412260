"""The example app (examples/flask_app) served on the database named by DATABASE_URL.

The example's `app.py` pins its own SQLite file; for the container trial (deploy/compose.yaml and
deploy/kubernetes/) this module serves its models on the database the reconciler keeps in step.
Run with `flask --app trial_app run --host 0.0.0.0 --port 8000` in the folder that holds `app.py`.

    GET /         the number of users: 200 once the schema is there, 503 before
    GET /healthz  200 while the process runs (never touches the database)
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from app import User, db  # the example's models (importing them does not connect)
from flask import Flask

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
db.init_app(app)


@app.get("/")
def users() -> tuple[dict[str, object], int]:
    try:
        count = db.session.execute(sa.select(sa.func.count()).select_from(User)).scalar_one()
    except sa.exc.SQLAlchemyError as exc:
        db.session.rollback()
        return {"ok": False, "error": type(exc).__name__, "hint": "is the schema at its heads yet?"}, 503
    return {"ok": True, "users": count}, 200


@app.get("/healthz")
def healthz() -> tuple[str, int]:
    return "ok\n", 200
