set terminal pngcairo size 900,560 font ',10' noenhanced
set output 'curves.png'
set title 'cmoe study rmoe, valid bpc, mean +- sd over seeds'
set xlabel 'step'
set ylabel 'valid bpc'
set grid
set key outside right top
set style fill transparent solid 0.2 noborder
plot 'curves.tsv' index 0 using 1:3:4 with filledcurves lc rgb '#4477aa' notitle, 'curves.tsv' index 0 using 1:2 with lines lw 2 lc rgb '#4477aa' title 'top2-4', \
     'curves.tsv' index 1 using 1:3:4 with filledcurves lc rgb '#cc3311' notitle, 'curves.tsv' index 1 using 1:2 with lines lw 2 lc rgb '#cc3311' title 'rmoe-4', \
     'curves.tsv' index 2 using 1:3:4 with filledcurves lc rgb '#228833' notitle, 'curves.tsv' index 2 using 1:2 with lines lw 2 lc rgb '#228833' title 'top2-8', \
     'curves.tsv' index 3 using 1:3:4 with filledcurves lc rgb '#ccbb44' notitle, 'curves.tsv' index 3 using 1:2 with lines lw 2 lc rgb '#ccbb44' title 'rmoe-8', \
     'curves.tsv' index 4 using 1:3:4 with filledcurves lc rgb '#66ccee' notitle, 'curves.tsv' index 4 using 1:2 with lines lw 2 lc rgb '#66ccee' title 'rmoe-zero-8'
