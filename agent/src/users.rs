//! Resolves an OCI `User` string (`user`, `uid`, `user:group`, `uid:gid`)
//! against the guest's own /etc/passwd and /etc/group. The agent is linked
//! statically, so it reads the files itself instead of using NSS.

use std::fs;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: Option<Vec<u8>>,
}

impl Identity {
    pub fn root() -> Identity {
        Identity { uid: 0, gid: 0, groups: Vec::new(), home: Some(b"/root".to_vec()) }
    }
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn groups(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3].split(',').filter(|m| !m.is_empty()).map(str::to_string).collect(),
            })
        })
        .collect()
}

/// Resolves `spec` with the given passwd and group file contents.
pub fn resolve_with(spec: &str, passwd_text: &str, group_text: &str) -> Result<Identity, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(Identity::root());
    }
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let users = passwd(passwd_text);
    let grps = groups(group_text);
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => users.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            users
                .iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| format!("user {:?} not found in the guest's /etc/passwd", user_part))?,
        ),
    };
    let uid = match entry {
        Some(e) => e.uid,
        None => user_part.parse::<u32>().map_err(|_| format!("bad user {:?}", user_part))?,
    };
    let mut gid = entry.map(|e| e.gid).unwrap_or(0);
    if let Some(g) = group_part {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => grps
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| format!("group {:?} not found in the guest's /etc/group", g))?,
        };
    }
    let mut supplementary: Vec<u32> = Vec::new();
    if group_part.is_none() {
        if let Some(e) = entry {
            for g in &grps {
                if g.members.iter().any(|m| *m == e.name) && !supplementary.contains(&g.gid) {
                    supplementary.push(g.gid);
                }
            }
        }
    }
    if !supplementary.contains(&gid) {
        supplementary.insert(0, gid);
    }
    Ok(Identity {
        uid,
        gid,
        groups: supplementary,
        home: entry.map(|e| e.home.as_bytes().to_vec()),
    })
}

/// Resolves `spec` against the guest's /etc files.
pub fn resolve(spec: &[u8]) -> Result<Identity, String> {
    let spec = std::str::from_utf8(spec).map_err(|_| "user is not UTF-8".to_string())?;
    // The default user needs no files (two reads per exec otherwise).
    if spec.trim().is_empty() {
        return Ok(Identity::root());
    }
    let p = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let g = fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_with(spec, &p, &g)
}

#[cfg(test)]
mod tests {
    use super::*;
    const P: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\napp:x:1000:1000::/home/app:/bin/sh\n";
    const G: &str = "root:x:0:\nnogroup:x:65534:\napp:x:1000:\ndocker:x:999:app,other\n";

    #[test]
    fn names_and_numbers() {
        assert_eq!(resolve_with("", P, G).unwrap().uid, 0);
        let a = resolve_with("app", P, G).unwrap();
        assert_eq!((a.uid, a.gid), (1000, 1000));
        assert_eq!(a.groups, vec![1000, 999]);
        assert_eq!(a.home.as_deref(), Some(&b"/home/app"[..]));
        let n = resolve_with("1000:65534", P, G).unwrap();
        assert_eq!((n.uid, n.gid), (1000, 65534));
        let u = resolve_with("4242", P, G).unwrap();
        assert_eq!((u.uid, u.gid, u.home), (4242, 0, None));
        let g = resolve_with("nobody:app", P, G).unwrap();
        assert_eq!((g.uid, g.gid), (65534, 1000));
        assert!(resolve_with("ghost", P, G).is_err());
        assert!(resolve_with("app:ghosts", P, G).is_err());
    }
}
