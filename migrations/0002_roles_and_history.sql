-- Roles (owner, admin, member) and history visibility (since_join, shared).
-- Every conversation's creator becomes its owner.

ALTER TABLE conversations ADD COLUMN IF NOT EXISTS history text NOT NULL DEFAULT 'since_join'
    CHECK (history IN ('since_join', 'shared'));

ALTER TABLE members ADD COLUMN IF NOT EXISTS role text NOT NULL DEFAULT 'member'
    CHECK (role IN ('owner', 'admin', 'member'));

UPDATE members m SET role = 'owner'
    FROM conversations c
    WHERE m.conversation_id = c.id AND m.user_id = c.created_by AND m.role = 'member';
