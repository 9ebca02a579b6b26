# Prints the value of the [data] entry "<key>" of an initdata TOML written with '''literal'''
# strings (the opening ''' ends its line, the closing ''' stands alone), as kata-agent would
# write it to <key>; exits 1 when the entry is absent.
BEGIN { start = "\"" key "\" = '''"; found = 0; done = 0 }
!inside && $0 == start { inside = 1; found = 1; next }
inside && $0 == "'''" { inside = 0; done = 1; exit }
inside { print }
END { exit (found && done) ? 0 : 1 }
