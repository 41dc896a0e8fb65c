// Package setcookie keeps the cookies a cluster sets on the host that set
// them. The relay's certificate covers every tenant's host under its
// domain, and a Set-Cookie whose Domain attribute names that domain would
// reach every other tenant's hosts (cookie tossing; SameSite does not
// separate tenants of one site). Without the attribute, a cookie is
// host-only (RFC 6265, 5.3).
package setcookie

import "bytes"

// domainAt returns the offset in a Set-Cookie value of the ';' that
// starts its first Domain attribute at or after from, or -1.
func domainAt(v []byte, from int) int {
	for i := from; i < len(v); i++ {
		if v[i] != ';' {
			continue
		}
		a := bytes.TrimLeft(v[i+1:], " \t")
		if len(a) >= 6 && bytes.EqualFold(a[:6], []byte("domain")) {
			rest := bytes.TrimLeft(a[6:], " \t")
			if len(rest) == 0 || rest[0] == '=' || rest[0] == ';' {
				return i
			}
		}
	}
	return -1
}

// HasDomain reports whether a Set-Cookie value has a Domain attribute.
func HasDomain(v []byte) bool { return domainAt(v, 0) >= 0 }

// StripDomain returns a Set-Cookie value without its Domain attributes.
func StripDomain(v []byte) []byte {
	out := v
	for i := domainAt(out, 0); i >= 0; i = domainAt(out, i) {
		if &out[0] == &v[0] {
			out = append([]byte(nil), v...)
		}
		j := bytes.IndexByte(out[i+1:], ';')
		if j < 0 {
			out = out[:i]
		} else {
			out = append(out[:i], out[i+1+j:]...)
		}
	}
	return out
}

// HideDomain renames a Set-Cookie value's Domain attributes to
// "Xomain", in place, which a browser ignores as it ignores any attribute
// it does not know (RFC 6265, 5.2). The value keeps its length, for a
// field HTTP/2's header compression has indexed at that size on the
// other end.
func HideDomain(v []byte) {
	for i := domainAt(v, 0); i >= 0; i = domainAt(v, i+1) {
		j := i + 1
		for v[j] == ' ' || v[j] == '\t' {
			j++
		}
		v[j] = 'X'
	}
}
