-- chatmail push trigger for the push_notification Lua driver of Dovecot 2.3 and 2.4
-- (the same file for both: neither the hooks nor the mail API it uses changed).
--
-- Loaded only for LMTP (see <version>/conf.d/90-chatmail-metadata.conf).  For every message
-- delivered to a user whose sender (the From header's address) is somebody else,
-- it writes the IMAP METADATA entry /private/messagenew = "" on the mailbox the
-- message went to.  Dovecot turns that into a dict transaction
--   B<id>\t<user>[\t0]  /  S<id>\tpriv/<mailbox-guid>/messagenew\t  /  C<id>
-- and chatmail-metadata answers it by queueing a push to the user's devices.
--
-- A failing dict (chatmail-metadata down, commit refused) must never fail or
-- delay the delivery itself, so every call into Dovecot's mailbox API runs under
-- pcall and failures are only logged.

local PUSH_ENTRY = "/private/messagenew"

local function log_error(msg)
  local ok = pcall(dovecot.i_error, "chatmail push: " .. tostring(msg))
  if not ok then
    io.stderr:write("chatmail push: " .. tostring(msg) .. "\n")
  end
end

-- Addresses are compared case-insensitively and without surrounding blanks.
local function normalized(addr)
  if type(addr) ~= "string" then
    return nil
  end
  addr = addr:match("^%s*(.-)%s*$"):lower()
  if addr == "" then
    return nil
  end
  return addr
end

local function write_push_entry(user, mailbox_name)
  local mbox = user:mailbox(mailbox_name)
  local ok, err = pcall(function()
    -- Refresh the mailbox view so the attribute goes to the current mailbox
    -- (its GUID), also when the delivery has just created it.
    mbox:sync()
    mbox:metadata_set(PUSH_ENTRY, "")
  end)
  pcall(mbox.free, mbox)
  if not ok then
    error(err, 0)
  end
end

-- The transaction context is the mail user; nothing else needs to be kept.
function dovecot_lua_notify_begin_txn(user)
  return user
end

function dovecot_lua_notify_event_message_new(user, event)
  local ok, err = pcall(function()
    local recipient = normalized(user.username)
    local sender = normalized(event.from_address)
    if sender ~= nil and sender == recipient then
      -- Mail from the user to themselves (e.g. a copy for their other devices):
      -- the device that sent it is awake already.
      return
    end
    write_push_entry(user, event.mailbox or "INBOX")
  end)
  if not ok then
    log_error("cannot signal new mail for " .. tostring(user.username) .. ": " .. tostring(err))
  end
end

function dovecot_lua_notify_end_txn(ctx, success)
end
