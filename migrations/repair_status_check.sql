-- Repair, not a migration: migration 2's check constraint on `status`, re-added when a recorded
-- table lost it (run by `migrate`). Fails, naming the constraint, while a row holds a status the
-- relay does not know: fix or delete such rows first.
alter table {{table}} add constraint {{table}}_status_check
    check (status in ('new', 'done', 'failed'));
