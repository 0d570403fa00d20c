"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-24 04:04:25.052301
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("mime", sa.String(length=32), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "invitations",
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("note", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("token"),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("consent_version", sa.String(length=64), nullable=False),
        sa.Column("consented_at", sa.DateTime(), nullable=False),
        sa.Column("invitation", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["invitation"],
            ["invitations.token"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("invitation"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("image_0", sa.String(length=64), nullable=False),
        sa.Column("image_1", sa.String(length=64), nullable=False),
        sa.Column("model_0", sa.String(length=200), nullable=False),
        sa.Column("model_1", sa.String(length=200), nullable=False),
        sa.Column("provenance_0", sa.JSON(), nullable=False),
        sa.Column("provenance_1", sa.JSON(), nullable=False),
        sa.Column("ordering", sa.JSON(), nullable=True),
        sa.Column("shown_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_0"],
            ["images.id"],
        ),
        sa.ForeignKeyConstraint(
            ["image_1"],
            ["images.id"],
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pairs_user_id"), ["user_id"], unique=False)

    op.create_table(
        "choices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=8), nullable=False),
        sa.Column("label_0", sa.Float(), nullable=False),
        sa.Column("label_1", sa.Float(), nullable=False),
        sa.Column("chosen_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["pair_id"],
            ["pairs.id"],
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pair_id"),
    )
    with op.batch_alter_table("choices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_choices_chosen_at"), ["chosen_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_choices_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("choices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_choices_user_id"))
        batch_op.drop_index(batch_op.f("ix_choices_chosen_at"))

    op.drop_table("choices")
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pairs_user_id"))

    op.drop_table("pairs")
    op.drop_table("users")
    op.drop_table("settings")
    op.drop_table("invitations")
    op.drop_table("images")
