//! ACL checks on the keys pgcache derives: a client's user must be allowed
//! on the derived key as if it had named the key itself.

use super::reply::redis_string;
use redis_module::{raw, AclPermissions, Context, ContextFlags, RedisError, RedisString};
use std::sync::atomic::{AtomicPtr, Ordering};

/// A client's ACL user, resolved once per command (what the crate's
/// `acl_check_key_permission` does, without its error strings). Redis 7.0
/// offers no cheaper way to it: the name is copied out (`GetCurrentUserName`)
/// and looked up (`GetModuleUserFromUserName`, which allocates a wrapper) on
/// every command. Keeping a user across commands is not safe in general:
/// ACL DELUSER and ACL LOAD free users, and AUTH changes a client's user,
/// without telling modules. The `default` user is the exception: Redis never
/// frees it (DELUSER refuses it, ACL LOAD copies the new rules into it), so
/// its wrapper is looked up once; its rules are still read on every check,
/// so ACL SETUSER default takes effect at once.
pub struct Acl {
    /// `None`: no such user; it is refused everything.
    wrapper: Option<*mut raw::RedisModuleUser>,
    /// Freed on drop (every user but `default`).
    owned: bool,
    /// A command another module runs through `RM_Call`: its temporary
    /// client has no user (Redis 7.0 gives a module no way to read the user
    /// of such a call, and `RM_GetCurrentUserName` would dereference the
    /// missing one); the calling module's own rules apply, as for every
    /// other command it calls.
    module_call: bool,
}

impl Acl {
    /// The ACL of user `user`, or of the context's client when `None` (a
    /// command handler's context; a background context is always `default`,
    /// so continuations pass the client's name taken in the handler).
    pub fn of(ctx: &Context, user: Option<&[u8]>) -> Acl {
        let user_name = match user {
            Some(user) => redis_string(Some(ctx), user),
            None => {
                if is_module_call(ctx) {
                    return Acl {
                        wrapper: None,
                        owned: false,
                        module_call: true,
                    };
                }
                // SAFETY: the result (NULL when the context has no client)
                // is owned here and freed on drop.
                let inner = unsafe { raw::RedisModule_GetCurrentUserName.unwrap()(ctx.ctx) };
                if inner.is_null() {
                    return Acl {
                        wrapper: None,
                        owned: false,
                        module_call: false,
                    };
                }
                RedisString::from_redis_module_string(std::ptr::null_mut(), inner)
            }
        };
        if user_name.as_slice() == DEFAULT_USER_NAME {
            return Acl {
                wrapper: default_user(),
                owned: false,
                module_call: false,
            };
        }
        // SAFETY: a valid name; the wrapper is freed on drop, before the
        // user it points to can go away (main thread / Redis's lock).
        let wrapper =
            unsafe { raw::RedisModule_GetModuleUserFromUserName.unwrap()(user_name.inner) };
        Acl {
            wrapper: (!wrapper.is_null()).then_some(wrapper),
            owned: !wrapper.is_null(),
            module_call: false,
        }
    }

    /// Whether the user may access key `name` with `permissions`.
    pub fn allows(&self, name: &RedisString, permissions: &AclPermissions) -> bool {
        if self.module_call {
            return true;
        }
        let Some(wrapper) = self.wrapper else {
            return false;
        };
        // SAFETY: `wrapper` is a live wrapper of a live ACL user.
        let status = unsafe {
            raw::RedisModule_ACLCheckKeyPermissions.unwrap()(
                wrapper,
                name.inner,
                permissions.bits(),
            )
        };
        status == raw::REDISMODULE_OK as std::os::raw::c_int
    }

    /// `allows`, as the error a command answers (`key` is `name`'s text).
    pub fn check(
        &self,
        name: &RedisString,
        key: &[u8],
        permissions: &AclPermissions,
    ) -> Result<(), RedisError> {
        if self.allows(name, permissions) {
            Ok(())
        } else {
            Err(no_permission(key))
        }
    }
}

impl Drop for Acl {
    fn drop(&mut self) {
        if let (Some(wrapper), true) = (self.wrapper, self.owned) {
            // SAFETY: made by GetModuleUserFromUserName and not shared.
            unsafe { raw::RedisModule_FreeModuleUser.unwrap()(wrapper) };
        }
    }
}

fn no_permission(key: &[u8]) -> RedisError {
    RedisError::String(format!(
        "NOPERM this user has no permissions to access the '{}' key derived by pgcache",
        String::from_utf8_lossy(key)
    ))
}

/// Whether the context's client has no ACL user that a module can read:
/// the temporary client of another module's `RM_Call` (not among Redis's
/// clients; `RM_GetCurrentUserName` would dereference its missing user), or
/// a client with no user (the replication link). Known per client id (ids
/// are never reused), so the lookups below run once per client, not once
/// per command. A script's client is not among Redis's clients either but
/// carries the caller's user; a module command that a script runs and that
/// calls PGCACHE.* through `RM_Call` is taken for the script's client unless
/// that temporary client was met outside a script before.
fn is_module_call(ctx: &Context) -> bool {
    // SAFETY: a live context.
    let id = unsafe { raw::RedisModule_GetClientId.unwrap()(ctx.ctx) };
    let slot = &CLIENT_KINDS[(id as usize) & (CLIENT_KINDS.len() - 1)];
    let known = slot.load(Ordering::Relaxed);
    if id != 0 && known >> 1 == id {
        return known & 1 == 1;
    }
    // SAFETY: a live context; the name (when there is one) is freed here.
    let name = unsafe { raw::RedisModule_GetClientUserNameById.unwrap()(ctx.ctx, id) };
    let (no_user, certain) = if !name.is_null() {
        // SAFETY: made for this call, not shared.
        unsafe { raw::RedisModule_FreeString.unwrap()(ctx.ctx, name) };
        (false, true)
    } else if std::io::Error::last_os_error().raw_os_error() == Some(ENOTSUP) {
        (true, true)
    } else if ctx.get_flags().contains(ContextFlags::LUA) {
        // Not among Redis's clients: the script's own client, most likely.
        (false, false)
    } else {
        (true, true)
    };
    if certain && id < 1 << 63 {
        slot.store(id << 1 | u64::from(no_user), Ordering::Relaxed);
    }
    no_user
}

/// `ENOTSUP` on Linux: what `RM_GetClientUserNameById` sets for a client
/// without a user.
const ENOTSUP: i32 = 95;

/// Client id → whether it is a module call's temporary client, as
/// `id << 1 | flag`: a plain array (command handlers run on Redis's main
/// thread only), cheaper than a thread-local in a shared library.
static CLIENT_KINDS: [std::sync::atomic::AtomicU64; 64] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 64];

const DEFAULT_USER_NAME: &[u8] = b"default";

/// The wrapper of Redis's `default` ACL user, made once and never freed
/// (see `Acl`).
static DEFAULT_USER: AtomicPtr<raw::RedisModuleUser> = AtomicPtr::new(std::ptr::null_mut());

fn default_user() -> Option<*mut raw::RedisModuleUser> {
    let known = DEFAULT_USER.load(Ordering::Acquire);
    if !known.is_null() {
        return Some(known);
    }
    let name = redis_string(None, DEFAULT_USER_NAME);
    // SAFETY: a valid name; the wrapper is kept for the process's life.
    let made = unsafe { raw::RedisModule_GetModuleUserFromUserName.unwrap()(name.inner) };
    if made.is_null() {
        return None;
    }
    match DEFAULT_USER.compare_exchange(
        std::ptr::null_mut(),
        made,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => Some(made),
        Err(first) => {
            // SAFETY: ours lost the race and is not shared.
            unsafe { raw::RedisModule_FreeModuleUser.unwrap()(made) };
            Some(first)
        }
    }
}
