-- loyalty_redeem(): a new redemption applied in one statement (one round trip instead of five).
--
-- The same rules as loyalty.ledger.Book.debit for a new redemption on an existing account with spendable
-- points: lock the account row, take the oldest spendable lots first (expires_at, earned_at, id in code-point
-- order), write the redemption, its lots, one immutable ledger entry, the new balance and the `points.redeemed`
-- outbox message (a LoyaltyEvent), all in the caller's transaction. Every other case (unknown account, nothing
-- spendable, an id that exists: replay or 409) returns no row and changes nothing, and the caller takes the
-- general path in Python. tests/test_rules.py pins this function and the Book together (same inputs, same
-- ledger, lots and message).
--
-- This file is the function's one definition. Migration 0006 applies it with CREATE OR REPLACE; after an
-- edit, add a migration that applies it again (databases migrated past 0006 do not read it again).
CREATE OR REPLACE FUNCTION loyalty_redeem(
    p_redemption_id text,
    p_customer_id text,
    p_request_hash text,
    p_check_amount numeric,
    p_points_requested numeric,
    p_wanted numeric,
    p_point_value numeric,
    p_order_id text,
    p_store_id text,
    p_now timestamptz,
    p_now_iso text,
    p_check_text text,
    p_topic text
) RETURNS TABLE (points_applied numeric, money_applied numeric, balance_after numeric)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_balance numeric;
    v_available numeric;
    v_applied numeric;
    v_money numeric;
    v_left numeric;
    v_take numeric;
    v_lots jsonb := '{}'::jsonb;
    v_data jsonb;
    v_ref text := 'redemption:' || p_redemption_id;
    lot record;
BEGIN
    -- Each statement below sees the rows committed before it ran (READ COMMITTED), so the lots read after
    -- this lock include every change made by a transaction that held the lock before us.
    SELECT a.balance INTO v_balance FROM accounts a WHERE a.customer_id = p_customer_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM redemptions r WHERE r.redemption_id = p_redemption_id) THEN
        RETURN;
    END IF;
    SELECT coalesce(sum(l.remaining), 0) INTO v_available FROM lots l
        WHERE l.customer_id = p_customer_id AND l.remaining > 0 AND l.expires_at > p_now;
    v_applied := least(p_wanted, v_available);
    IF v_applied <= 0 THEN
        RETURN;
    END IF;
    v_money := trunc(v_applied * p_point_value, 2);
    INSERT INTO redemptions (redemption_id, customer_id, request_hash, check_amount, points_requested,
                             points_applied, money_applied, status, order_id, store_id, created_at)
        VALUES (p_redemption_id, p_customer_id, p_request_hash, p_check_amount, p_points_requested,
                v_applied, v_money, 'applied', p_order_id, p_store_id, p_now)
        ON CONFLICT (redemption_id) DO NOTHING;
    IF NOT FOUND THEN  -- the same id, inserted concurrently for another account: the general path answers
        RETURN;
    END IF;
    v_left := v_applied;
    FOR lot IN
        SELECT l.id, l.remaining FROM lots l
        WHERE l.customer_id = p_customer_id AND l.remaining > 0 AND l.expires_at > p_now
        ORDER BY l.expires_at, l.earned_at, l.id COLLATE "C"
    LOOP
        EXIT WHEN v_left <= 0;
        v_take := least(lot.remaining, v_left);
        UPDATE lots SET remaining = remaining - v_take WHERE id = lot.id;
        INSERT INTO redemption_lots (redemption_id, lot_id, points, returned) VALUES (p_redemption_id, lot.id, v_take, 0);
        v_lots := v_lots || jsonb_build_object(lot.id, v_take::text);
        v_left := v_left - v_take;
    END LOOP;
    v_balance := v_balance - v_applied;
    UPDATE accounts SET balance = v_balance, updated_at = p_now WHERE customer_id = p_customer_id;
    v_data := jsonb_build_object('money', v_money::text, 'check_amount', p_check_text, 'lots', v_lots);
    INSERT INTO ledger (ref, customer_id, kind, points, debt_change, balance_after, occurred_at, recorded_at,
                        lot_id, order_id, redemption_id, data)
        VALUES (v_ref, p_customer_id, 'redemption', -v_applied, 0, v_balance, p_now, p_now, NULL, p_order_id,
                p_redemption_id, v_data);
    INSERT INTO outbox (topic, key, value) VALUES (
        p_topic,
        p_customer_id,
        convert_to(jsonb_build_object(
            'id', 'loyalty:points.redeemed:' || v_ref,
            'type', 'points.redeemed',
            'customer_id', p_customer_id,
            'occurred_at', p_now_iso,
            'points', (-v_applied)::text,
            'balance', v_balance::text,
            'data', v_data
        )::text, 'UTF8')
    );
    -- Wakes the relay (it listens on this channel); delivered at commit, once per transaction and payload.
    PERFORM pg_notify('crm_outbox', '');
    points_applied := v_applied;
    money_applied := v_money;
    balance_after := v_balance;
    RETURN NEXT;
END
$$;
