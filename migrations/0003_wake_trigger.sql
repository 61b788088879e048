-- Wake path: a statement-level AFTER INSERT trigger with an empty NOTIFY payload (the table is
-- the source of truth; the notification only wakes a relay).
--
-- NOTIFY makes every notifying commit take a database-wide lock, so writers notify only while a
-- relay is waiting: a waiting relay holds (or queues for) this table's advisory lock in exclusive
-- mode, which makes the writer's shared try-lock fail. A writer whose try-lock succeeds holds the
-- shared lock until it commits, so a relay that takes the exclusive lock afterwards is ordered
-- after that commit and finds the row in its catch-up poll.
create or replace function {{table}}_outbox_wake() returns trigger
language plpgsql as $fn$
begin
  if not pg_try_advisory_xact_lock_shared({{lock_class}}, {{lock_key}}) then
    perform pg_notify('{{channel}}', '');
  end if;
  return null;
end
$fn$;
drop trigger if exists {{table}}_outbox_wake on {{table}};
create trigger {{table}}_outbox_wake after insert on {{table}}
    for each statement execute function {{table}}_outbox_wake();
